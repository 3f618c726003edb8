"""The report's sections on the study's trained pieces: the tokenizer, the evaluation classifier and
the generators' training (every decoder, every training seed)."""

from __future__ import annotations

from arpg import report_catalog as catalog
from arpg.engine.report.document import Report
from arpg.engine.report.points import numeric_leaves, read_output
from arpg.engine.report.text import markdown_kv, markdown_table
from arpg.paths import run_seed


def tokenizer_section(rep: Report) -> list[str]:
    tok_train = read_output(rep.layout.tokenizer_metrics, "train-tokenizer")
    source = (f"pretrained `{tok_train['pretrained']}`" if tok_train.get("pretrained")
              else "trained by `arpg train-tokenizer`")
    md = ["## Tokenizer\n", f"Weights: {source} ({tok_train.get('steps')} steps).\n"]
    if "tokenize" in rep.rules:
        tok = numeric_leaves(read_output(rep.layout.tokenize_metrics, "tokenize"))
        rep.csv(catalog.TOKENIZER_CSV, [tok], list(tok))
        rep.copy(rep.layout.reconstructions, catalog.RECONSTRUCTIONS_PNG)
        md += ["Reconstruction and codebook use (`arpg tokenize`):\n", markdown_kv(tok),
               f"![reconstructions]({catalog.RECONSTRUCTIONS_PNG})\n"]
    return md


def classifier_section(rep: Report) -> list[str]:
    if "train_classifier" not in rep.rules:
        return []
    clf = numeric_leaves(read_output(rep.layout.classifier_metrics, "train-classifier"))
    rep.csv(catalog.CLASSIFIER_CSV, [clf], list(clf))
    return ["## Evaluation classifier (sanity row)\n", markdown_kv(clf)]


def training_section(rep: Report) -> list[str]:
    rows = []
    several = len(rep.params["train"]["seeds"]) > 1
    for job in rep.jobs_of("train"):
        model, run = job.wildcards["model"], job.wildcards["run"]
        doc = read_output(rep.layout.model_metrics(model, run), " ".join(job.args))
        rows.append({"model": model, **({"train_seed": run_seed(run)} if several else {}),
                     "name": doc.get("model") if isinstance(doc, dict) else None,
                     **{k: v for k, v in numeric_leaves(doc).items() if k != "train_seed"}})
    cols = list(dict.fromkeys(k for r in rows for k in r))
    rep.csv(catalog.TRAINING_CSV, rows, cols)
    return ["## Training\n", markdown_table(rows, cols)]
