"""Where the child network lives: per attention head and per layer, Fisher importance, the child
network's share and how far fine-tuning moved the weights, as CSV and figures.

:mod:`.layout` maps parameters to (layer, head) from the model config (BERT/RoBERTa-style encoders,
LLaMA-style decoders with grouped-query attention, OPT, Phi); :mod:`.quantities` sums Fisher scores,
masks and weight differences (or a sparse delta) by head; :mod:`.table` writes and reads the CSV;
:mod:`.plots` draws heatmaps, scatter plots and runs side by side.  ``python -m childopt finetune --report-heads``
writes a report per run, and ``--compare-heads`` draws the runs of a task side by side
(:mod:`childopt.finetune.heads`).

    from childopt.analysis import (FISHER, SHARE, UPDATE, HeadLayout, child_share, fisher_importance,
                                   update_norms, write_csv)
    from childopt.analysis.plots import plot_heatmaps

    layout = HeadLayout.from_model(model)
    base = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    ...  # Fisher scores (childopt.fisher.fisher_scores), then fine-tune with a MaskedAdamW of a fixed mask
    report = {FISHER: fisher_importance(layout, scores), SHARE: child_share(layout, optimizer),
              UPDATE: update_norms(layout, base, dict(model.named_parameters()))}
    write_csv(report, "heads.csv")
    plot_heatmaps(report, "heatmaps.png", "my run")
"""
from childopt.analysis.layout import HeadLayout
from childopt.analysis.quantities import (FISHER, QUANTITIES, SHARE, UPDATE, HeadValues, child_share, delta_norms,
                                          fisher_importance, optimizer_masks, total_norm, update_norms)
from childopt.analysis.table import read_csv, write_csv

__all__ = ["HeadLayout", "HeadValues", "FISHER", "SHARE", "UPDATE", "QUANTITIES", "fisher_importance", "child_share",
           "optimizer_masks", "update_norms", "delta_norms", "total_norm", "read_csv", "write_csv"]
