"""``docs/configuration.md`` from the config's fields: ``python -m kvpo.training.config_doc``."""

from kvpo.training.config_parse import key_docs


def markdown() -> str:
    """``docs/configuration.md``: every key as a table row, by section."""
    lines = [
        "# Configuration",
        "",
        "Every key `kvpo train` (and `python -m kvpo.train`, `kvpo evaluate`, `KVPOTrainer`)",
        "reads, with its type, default and meaning. Keys are set in a YAML file (`--config`,",
        "nested keys as nested mappings) or as `key=value` overrides (nested keys dotted:",
        "`adapter.rank=8`); overrides win. The defaults are the built-in toy run",
        "([configs/toy.yaml](../configs/toy.yaml) states them in full). Generated from",
        "`kvpo/training/config.py` by `python -m kvpo.training.config_doc > "
        "docs/configuration.md`;",
        "a test checks that this page and the code agree.",
    ]
    for doc in key_docs():
        if doc.group:
            lines += ["", f"## {doc.group}", ""]
            lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        meaning = doc.help + (
            f" (choices: {', '.join(f'`{c}`' for c in doc.choices)})" if doc.choices else ""
        )
        cells = (f"`{doc.key}`", f"`{doc.type}`", f"`{doc.default!r}`", meaning)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
