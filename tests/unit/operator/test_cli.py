"""`kubeflash operator`: flags, the config they build, and no heavy imports when the module loads."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kubeflash_operator import cli


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_serve_all_namespaces_with_metrics_and_liveness():
    """No namespace flag means cluster-wide; metrics on 9090 and liveness on 8080 by default."""
    args = parse()
    cfg = cli.config_from_args(args)
    assert args.namespaces is None and not args.peering
    assert (cfg.metrics_port, cfg.liveness_port) == (9090, 8080)


def test_flags_override():
    """Namespaces repeat; ports, image and kubeconfig are taken as given."""
    args = parse("-n", "a", "--namespace", "b", "--metrics-port", "0", "--engine-image", "x:2", "--kubeconfig", "/k")
    cfg = cli.config_from_args(args)
    assert args.namespaces == ["a", "b"] and args.kubeconfig == "/k"
    assert (cfg.metrics_port, cfg.engine_image) == (0, "x:2")


def test_namespace_and_all_namespaces_conflict():
    """--namespace and --all-namespaces are mutually exclusive."""
    with pytest.raises(SystemExit):
        parse("-n", "a", "-A")


def test_importing_the_cli_pulls_in_neither_kopf_nor_torch():
    """The CLI module (and what it imports) loads without kopf, kubernetes or torch."""
    code = ("import sys, kubeflash_operator.cli; "
            "print(sorted(m for m in ('kopf', 'kubernetes', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.strip() == "[]"


def test_no_torch_anywhere_in_the_operator():
    """Importing every operator module (handlers included) never imports torch."""
    code = ("import sys, kubeflash_operator.handlers, kubeflash_operator.cli; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.strip() == "False"


def test_engine_device_flag_then_env_then_auto(monkeypatch):
    """--engine-device wins over $KUBEFLASH_OPERATOR_ENGINE_DEVICE, which wins over the default auto."""
    monkeypatch.delenv("KUBEFLASH_OPERATOR_ENGINE_DEVICE", raising=False)
    assert cli.config_from_args(parse()).engine_device == "auto"
    monkeypatch.setenv("KUBEFLASH_OPERATOR_ENGINE_DEVICE", "cuda")
    assert cli.config_from_args(parse()).engine_device == "cuda"
    assert cli.config_from_args(parse("--engine-device", "cpu")).engine_device == "cpu"


def test_bad_engine_device_is_refused():
    """A device the engine would not understand is an error at startup, not in every pod."""
    with pytest.raises(ValueError, match="engine device"):
        cli.config_from_args(parse("--engine-device", "tpu"))
