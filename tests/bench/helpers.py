"""Made-up benchmark rows and tables, for tests whose expected ratios are worked out by hand."""
from childopt.bench import step
from childopt.bench.stream import StreamReference

# The byte model of a few rows, per parameter element, by parameter dtype: AdamW reads p, g, m, v
# and writes p, m, v: 28 B in fp32; torch keeps bf16 moments for bf16 parameters (7 x 2 = 14 B),
# childopt fp32 ones (3 x 2 + 4 x 4 = 22 B); a dense mask adds a 1-byte read; sparse storage moves
# an int32 index, g, p twice and fp32 m and v twice per selected entry: 32 B in fp32, 26 in bf16,
# times 5%.
BYTES_PER_ELEMENT = {
    "float32": {"adamw-fused": 28, "masked-none": 28, "masked-dense-freeze": 29, "masked-sparse-0.05": 1.6},
    "bfloat16": {"adamw-fused": 14, "masked-none": 22, "masked-dense-freeze": 23, "masked-sparse-0.05": 1.3},
}


def fake_row(key, optimizer, mode, it_s, gbps, dtype="float32", threads=2):
    """A step row with made-up measurements (the fields :func:`step.compare` does not read are fixed)."""
    return step.Row(key=key, optimizer=optimizer, mode=mode, backend="b", it_s=it_s, ms_per_step=1e3 / it_s,
                    peak_gb=1.0, state_gb=0.5, bytes_per_step=1, gbps=gbps, numel=1, steps=1, dtype=dtype,
                    threads=threads)


def fake_stream(gbps, threads=2, llc_known=True):
    """A stream reference that measured ``gbps`` at ``threads`` threads (its cache size made up, or
    with ``llc_known=False`` a default that stood in for an unknown one)."""
    return StreamReference(gbps=gbps, numel=1000, bytes_per_element=28, kernel="fake", approximate=False,
                           threads=threads, llc_bytes=4000, llc_source="made up", llc_known=llc_known,
                           llc_instance_bytes=2000)


def fake_table(rows, stream_gbps=40.0, dtype="float32", threads=2, size="24m"):
    """A step table of made-up ``rows`` compared with a stream reference of ``stream_gbps``."""
    compared, baseline = step.compare(rows, stream_gbps)
    return step.Table(size, dtype, threads, fake_stream(stream_gbps, threads), compared, [], baseline)
