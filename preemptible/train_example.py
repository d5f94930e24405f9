"""Compatibility entry point: ``python -m preemptible.train_example`` runs :mod:`preemptible.examples.train`."""

from preemptible.examples.train import build_parser, main, options_to_argv, train, train_from_options  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
