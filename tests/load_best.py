"""Load a `best/` directory the way a new user would, in a fresh process that knows nothing of lorahpo: the standard
transformers loader, its own tokenizer (truncating where training did), and score the val rows recorded in
split.json. Prints {"accuracy", "f1", "fbeta", "loss"} as JSON.

    python tests/load_best.py BEST_DIR SPLIT_JSON DATA_TSV
"""

from __future__ import annotations

import csv
import json
import sys

import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, fbeta_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main(best: str, split_json: str, data_tsv: str) -> None:
    assert "lorahpo" not in sys.modules
    rows = json.load(open(split_json))["val"]
    df = pd.read_csv(data_tsv, sep="\t", header=None, names=["label", "text"], quoting=csv.QUOTE_NONE, dtype=str)
    labels = json.load(open(f"{best}/labels.json"))["label_names"]
    texts = df["text"].iloc[rows].tolist()
    y = torch.tensor([labels.index(v) for v in df["label"].iloc[rows]])
    tok = AutoTokenizer.from_pretrained(best)
    model = AutoModelForSequenceClassification.from_pretrained(best).eval()
    logits = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            batch = tok(texts[i : i + 32], truncation=True, padding=True, return_tensors="pt")
            logits.append(model(**batch).logits.float())
    logits = torch.cat(logits)
    pred = logits.argmax(-1)
    print(
        json.dumps(
            {
                "accuracy": accuracy_score(y, pred),
                "f1": f1_score(y, pred, average="macro"),
                "fbeta": fbeta_score(y, pred, beta=3) if len(labels) == 2 else None,
                "loss": F.cross_entropy(logits, y).item(),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
