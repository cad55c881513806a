"""The engine: one backbone, adapters from the store, label predictions. Every inference path
(CLI predict and eval, the demo) goes through it, so what `eval` reports is what users get."""

from dataclasses import dataclass
from pathlib import Path

from adapterlab.backbones import Backbone, load_backbone
from adapterlab.data import DataError, load_task
from adapterlab.metrics import classification_metrics
from adapterlab.model import AdapterModel
from adapterlab.recipe import DataConfig
from adapterlab.store import AdapterCard, StoreError, load_adapter, read_card, resolve, verify


@dataclass
class Prediction:
    label: str
    score: float
    scores: dict[str, float]


class Engine:
    """Serves adapters of one backbone. One adapter is active at a time; asking for another swaps it."""

    def __init__(self, backbone: Backbone | str, store: str | Path = "adapters"):
        self.backbone = load_backbone(backbone) if isinstance(backbone, str) else backbone
        self.store = Path(store)
        self._active: tuple[Path, AdapterModel, AdapterCard] | None = None

    @classmethod
    def for_adapter(cls, reference: str, store: str | Path = "adapters") -> "Engine":
        """An engine on the backbone that adapter `reference` was trained on."""
        folder = resolve(store, reference)
        problems = verify(folder)  # before the backbone loads: a broken adapter fails fast
        if problems:
            raise StoreError(f"adapter {folder} is unusable: {'; '.join(problems)}")
        return cls(read_card(folder).backbone, store)

    def activate(self, reference: str) -> tuple[AdapterModel, AdapterCard]:
        folder = resolve(self.store, reference).resolve()
        if self._active is None or self._active[0] != folder:
            if self._active is not None:
                self._active[1].detach_backbone()
                self._active = None
            model, card = load_adapter(folder, self.backbone)
            self._active = (folder, model, card)
        return self._active[1], self._active[2]

    def card(self, reference: str) -> AdapterCard:
        return self.activate(reference)[1]

    def predict(self, reference: str, texts: list[str], pairs: list[str] | None = None,
                batch_size: int = 64) -> list[Prediction]:
        model, card = self.activate(reference)
        probabilities = model.scores(texts, pairs, batch_size)
        predictions = []
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            predictions.append(Prediction(card.labels[best], row[best], dict(zip(card.labels, row))))
        return predictions

    def evaluate(self, reference: str, data: str, split: str = "test", limit: int | None = None) -> dict:
        """Metrics of an adapter on a dataset read with the adapter's own data settings."""
        model, card = self.activate(reference)
        config = DataConfig.model_validate({**card.recipe["data"], "path": data, "test_path": None,
                                            "labels": card.labels, "k": None, "test_limit": None})
        task = load_task(config)
        rows = {"train": task.train, "test": task.test}.get(split)
        if rows is None:
            raise DataError(f"{data}: no {split!r} split (splits: train, test)")
        if limit is not None:
            rows = rows.select(list(range(min(limit, len(rows)))))
        predictions = model.scores(rows.texts, rows.text_pairs).argmax(-1).tolist()
        return {"rows": len(rows), **classification_metrics(predictions, rows.labels, len(card.labels))}
