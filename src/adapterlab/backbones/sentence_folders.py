"""A sentence-transformers folder read as its authors meant (pooling, normalisation, default prompt),
and written so that sentence-transformers reads a merged adapter as adapterlab's head pools it.

The three files (modules.json, the pooling module's config.json, config_sentence_transformers.json)
are read directly, in both the legacy format (`pooling_mode_*_token` flags) and the current one
(`pooling_mode`): importing sentence-transformers costs seconds at every backbone load, and its
module API moved between versions 5 and 6 while the file format stayed readable. They are written
in the legacy format, which every version and other readers (text-embeddings-inference) take."""

import json
from dataclasses import dataclass
from pathlib import Path

_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# sentence-transformers' pooling modes that adapterlab's heads compute the same way.
POOLING = {"cls": "cls", "mean": "mean", "lasttoken": "last"}
SENTENCE_POOLING = {ours: theirs for theirs, ours in POOLING.items()}  # a head's pooling, as they name it


@dataclass(frozen=True)
class SentenceSettings:
    """`pooling`: the folder's pooling mode as sentence-transformers names it (None: no such
    folder); `normalize`: it ends in a Normalize module; `prompt`: its default prompt ('' if none)."""

    pooling: str | None = None
    normalize: bool = False
    prompt: str = ""


def read_sentence_settings(path: Path) -> SentenceSettings:
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return SentenceSettings()
    modules = {m["type"].rsplit(".", 1)[-1]: m for m in json.loads(modules_file.read_text())}
    pooling = None
    if "Pooling" in modules:
        config = json.loads((path / modules["Pooling"]["path"] / "config.json").read_text())
        pooling = config.get("pooling_mode") or [m for key, m in _LEGACY_MODES.items() if config.get(key)] or "mean"
        if isinstance(pooling, list):
            pooling = pooling[0] if len(pooling) == 1 else "+".join(pooling)
    prompt = ""
    settings_file = path / "config_sentence_transformers.json"
    if settings_file.is_file():
        settings = json.loads(settings_file.read_text())
        prompt = (settings.get("prompts") or {}).get(settings.get("default_prompt_name") or "", "")
    return SentenceSettings(pooling, "Normalize" in modules, prompt)


def write_sentence_settings(path: Path, settings: SentenceSettings, dimension: int, max_seq_length: int) -> None:
    """The files that make `path`, a transformers model folder, a sentence-transformers folder that
    pools, normalises and prompts as `settings` say, reading `max_seq_length` tokens at most."""
    modules = [("Transformer", ""), ("Pooling", "1_Pooling")]
    if settings.normalize:
        modules.append(("Normalize", "2_Normalize"))
    _write_json(path / "modules.json", [{"idx": i, "name": str(i), "path": folder,
                                         "type": f"sentence_transformers.models.{kind}"}
                                        for i, (kind, folder) in enumerate(modules)])
    _write_json(path / "1_Pooling" / "config.json", {"word_embedding_dimension": dimension, **{
        flag: mode == settings.pooling for flag, mode in _LEGACY_MODES.items()}})
    if settings.normalize:
        (path / "2_Normalize").mkdir()  # Normalize has no settings; its folder is what modules.json names
    _write_json(path / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    prompts = {"query": settings.prompt} if settings.prompt else {}
    _write_json(path / "config_sentence_transformers.json", {
        "prompts": prompts, "default_prompt_name": "query" if settings.prompt else None,
        "similarity_fn_name": "cosine"})


def _write_json(file: Path, value) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(value, indent=2))
