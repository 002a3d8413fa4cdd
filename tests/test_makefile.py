"""The Makefile forwards Hydra overrides typed on make's command line, in order, intact."""
import subprocess

import pytest

from quantpipe import PROJECT_ROOT


def forwarded(*words: str) -> list[str]:
    """Run make's real variable handling through scripts/with_overrides.py (dry echo command)."""
    mk = ("export QP_MAKEOVERRIDES = $(MAKEOVERRIDES)\n"
          "t:\n\t@python3 scripts/with_overrides.py python3 -c "
          "'import json,sys; print(json.dumps(sys.argv[1:]))'\n")
    res = subprocess.run(["make", "-s", "-f", "-", "t", *words], input=mk, text=True,
                         capture_output=True, cwd=PROJECT_ROOT, check=True)
    import json
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_literal_plus_quant():
    assert forwarded("+quant=int4") == ["+quant=int4"]


def test_several_overrides_keep_their_order():
    assert forwarded("+quant=gguf", "quant.type=q5_k_m", "eval.n_windows=4") == [
        "+quant=gguf", "quant.type=q5_k_m", "eval.n_windows=4"]


def test_spaces_dollars_and_quotes_survive():
    assert forwarded("eval.sample.prompt=Hi there", "x=$HOME", "y=it's") == [
        "eval.sample.prompt=Hi there", "x=$HOME", "y=it's"]


def test_make_variables_are_not_forwarded():
    assert forwarded("+quant=int8", "ARGS=-x", "FILE=a.json") == ["+quant=int8"]


def test_multirun_through_make():
    assert forwarded("hydra.mode=MULTIRUN", "+quant=int8,int4") == [
        "hydra.mode=MULTIRUN", "+quant=int8,int4"]


@pytest.mark.parametrize("target", ["pipeline", "sweep", "report", "test"])
def test_targets_exist(target):
    res = subprocess.run(["make", "-n", target, "+quant=int4"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_a_repeated_variable_reaches_the_pipeline_twice():
    """make keeps only the last of `+quant=int4 +quant=int8`; the words typed are handed on, so
    that the pipeline can refuse the pair instead of silently running int8."""
    assert forwarded("+quant=int4", "eval.n_ctx=64", "+quant=int8") == [
        "+quant=int4", "eval.n_ctx=64", "+quant=int8"]
