"""Which rows to label: from an unlabelled pool, k rows per class that a person should label first.

One backbone pass gives each row its sentence embedding and the zero-shot classifier's guess (the
classifier's own prompt, pooling and head: `zeroshot`). Within each guessed class, k-means with k
clusters picks the row nearest each centre: rows that stand for the class's main kinds of text
(representative) and differ from one another (diverse). The guesses only balance the picks across
classes; the labels are the person's.
"""

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from tqdm.auto import tqdm

from adapterlab.backbones import features, tokenize
from adapterlab.data import DataError, Pool
from adapterlab.heads import pool, pooling_of
from adapterlab.mixed_batch import Servable
from adapterlab.recipe import HeadConfig
from adapterlab.zeroshot import zero_shot_servable


@dataclass
class Selection:
    """Pool rows to label, class by guessed class, and the zero-shot classifier's guess for each."""

    indices: list[int]
    suggested_labels: list[str]


def select_rows(engine, rows: Pool, labels: list[str], descriptions: list[str], k: int, seed: int = 0,
                show_progress: bool = False) -> Selection:
    """k × len(labels) rows of the pool to label, chosen by `choose_rows`."""
    if k * len(labels) > len(rows):
        raise DataError(f"k={k} rows for each of {len(labels)} labels is {k * len(labels)}, "
                        f"the pool has {len(rows)}")
    classifier = zero_shot_servable(engine.backbone, labels, descriptions)
    vectors, scores = embed_and_guess(engine, classifier, rows, show_progress)
    chosen = choose_rows(vectors, scores, k, seed)
    return Selection(chosen, [labels[int(scores[i].argmax())] for i in chosen])


def choose_rows(vectors: np.ndarray, scores: np.ndarray, k: int, seed: int) -> list[int]:
    """k rows per class that the scores (rows, labels) guess, the representatives of each class's
    vectors (rows, hidden). A class guessed for fewer than k rows gets all of them, and the rest of its
    share from the unchosen rows it scores highest (the rows nearest its description), so that the
    total stays k per label."""
    guesses = scores.argmax(1)
    chosen: list[int] = []
    for label in range(scores.shape[1]):
        members = np.flatnonzero(guesses == label)
        chosen += members.tolist() if len(members) <= k else members[representatives(vectors[members], k, seed)].tolist()
    guessed = np.bincount(guesses, minlength=scores.shape[1])
    for label in np.flatnonzero(guessed < k):  # a rarely guessed class: the rest of its share nearest it
        taken = set(chosen)
        nearest = np.argsort(-scores[:, label], kind="stable")
        chosen += [int(i) for i in nearest if i not in taken][:k - guessed[label]]
    return chosen


def representatives(vectors: np.ndarray, k: int, seed: int) -> list[int]:
    """k distinct rows: the nearest to each centre of a k-means clustering (seeded, so reproducible)."""
    distances = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_transform(vectors)  # (rows, centres)
    picked: list[int] = []
    for centre in range(k):  # two centres may share a nearest row: the second takes its next nearest
        picked.append(next(int(i) for i in np.argsort(distances[:, centre], kind="stable") if i not in picked))
    return picked


@torch.no_grad()
def embed_and_guess(engine, classifier: Servable, rows: Pool, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each row's unit-length sentence embedding (rows, hidden) and the zero-shot classifier's label
    probabilities (rows, labels), from one backbone pass per batch."""
    backbone, prompt = engine.backbone, classifier.prompt
    pooling = pooling_of(HeadConfig(), backbone)  # the pooling zero_shot_servable gives its head
    order = sorted(range(len(rows)), key=lambda i: len(rows.texts[i]) + len(rows.text_pairs[i] if rows.text_pairs else ""))
    vectors = np.zeros((len(rows), backbone.hidden_size), dtype=np.float32)
    scores = np.zeros((len(rows), len(classifier.labels)), dtype=np.float32)
    starts = range(0, len(order), engine.batch_size)
    for start in tqdm(starts, desc="embedding the pool", unit="batch", disable=not show_progress):
        chunk = order[start:start + engine.batch_size]  # similar lengths together: less padding
        pairs = [rows.text_pairs[i] for i in chunk] if rows.text_pairs else None
        batch = tokenize(backbone, [rows.texts[i] for i in chunk], pairs, prompt.template, prompt.max_length,
                         prompt.chat, prompt.demonstrations, prompt.text_prompt)
        feats = features(backbone, backbone.model, batch, need_hidden=True)
        vectors[chunk] = torch.nn.functional.normalize(pool(feats, pooling), dim=-1).cpu().numpy()
        scores[chunk] = classifier.head(feats).float().softmax(-1).cpu().numpy()
    return vectors, scores


def write_for_labelling(file: str | Path, rows: Pool, selection: Selection) -> None:
    """One JSONL row per pick, "label" left null for the person to fill with a label name; written to
    a temporary file first, so an interrupted run never leaves half a file."""
    lines = []
    for index, suggestion in zip(selection.indices, selection.suggested_labels):
        pair = {"text_pair": rows.text_pairs[index]} if rows.text_pairs else {}
        lines.append(json.dumps({"text": rows.texts[index], **pair, "label": None,
                                 "suggested_label": suggestion, "pool_index": index}, ensure_ascii=False))
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        os.replace(temporary, file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
