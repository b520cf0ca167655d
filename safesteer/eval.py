"""``python -m safesteer.eval``: the former name of ``python -m safesteer.evaluate``, still accepted."""

if __name__ == "__main__":
    from safesteer.cli import hydra_entry
    from safesteer.evaluate import command

    hydra_entry(command)
