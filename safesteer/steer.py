"""``python -m safesteer.steer``: the former name of ``python -m safesteer.prepare``, still accepted."""

if __name__ == "__main__":
    from safesteer.cli import hydra_entry
    from safesteer.prepare import command

    hydra_entry(command)
