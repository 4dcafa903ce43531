"""Made-up benchmark rows, for tests whose expected ratios are worked out by hand."""
from childopt.bench import step

# The byte model of a few rows, per parameter element: AdamW reads p, g, m, v and writes p, m, v
# (28 B), a dense mask adds a 1-byte read, sparse storage moves 32 B per selected entry (1.6 B at 5%).
BYTES_PER_ELEMENT = {"adamw-fused": 28, "masked-dense-freeze": 29, "masked-sparse-0.05": 1.6}


def fake_row(key, optimizer, mode, it_s, gbps):
    """A step row with made-up measurements (the fields :func:`step.compare` does not read are fixed)."""
    return step.Row(key=key, optimizer=optimizer, mode=mode, backend="b", it_s=it_s, ms_per_step=1e3 / it_s,
                    peak_gb=1.0, state_gb=0.5, bytes_per_step=1, gbps=gbps, numel=1, steps=1)
