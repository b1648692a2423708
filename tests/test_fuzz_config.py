"""Fuzzing run files and --set: whatever the text, `caldera check` answers 0 or one error block (exit 2), never
a traceback. Property-based (hypothesis), sized to run in seconds."""

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caldera.cli import main
from caldera.config import Config, load_config

# 150 examples a property keep the file near 10 s on one core; CALDERA_FUZZ_EXAMPLES=5000 searches longer.
FUZZ = settings(max_examples=int(os.environ.get("CALDERA_FUZZ_EXAMPLES", 150)), deadline=None, database=None,
                suppress_health_check=list(HealthCheck))  # fmt: skip
WORK = Path(tempfile.mkdtemp(prefix="caldera-fuzz-"))
GOOD = '[model]\nname = "mlp"\n[data]\nsource = "digits"\n'

SECTIONS = list(Config.model_fields)
KEYS = sorted({k for s in SECTIONS for k in getattr(Config.model_fields[s].annotation, "model_fields", {})})
# Strings without ':' : a value such as 'pkg:attr' in [model] name would import whatever module hypothesis names.
words = st.text(st.characters(blacklist_characters=":", blacklist_categories=["Cs"]), max_size=12)
names = st.sampled_from(SECTIONS + KEYS) | words
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | words
    | st.sampled_from(["mlp", "digits", "adam", "cosine", "allreduce", "bf16-mixed", "2h", "1:xx", "90s"])
    | st.binary(max_size=4)  # YAML !!binary
    | st.datetimes()
    | st.sets(st.integers(), max_size=3)  # YAML !!set
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)
documents = st.dictionaries(names, st.dictionaries(names, values, max_size=5) | values, max_size=6)


def check(path, *overrides):
    """Run `caldera check` in this process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    args = ["check", str(path)] + [f"--set={o}" for o in overrides]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    if code == 0:  # what `caldera train` records (config.resolved.json) loads again, as predict and serve do
        load_config(json.loads(json.dumps(load_config(path, list(overrides)).model_dump())))
    return code, out.getvalue(), err.getvalue()


def assert_one_answer(code, out, err):
    """0 with the resolved config as JSON, or 2 with one error line (or config.py's block of '  - ' problems)."""
    assert code in (0, 2), (code, err)
    if code == 0:
        json.loads(out)
        return
    lines = err.rstrip("\n").split("\n")
    assert lines[0].startswith("caldera: error: "), err
    assert all(line.startswith("  - ") for line in lines[1:]), err
    assert "Traceback" not in err


def write(name, data):
    path = WORK / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


@FUZZ
@given(doc=documents)
def test_fuzz_yaml_documents(doc):
    assert_one_answer(*check(write("doc.yaml", yaml.safe_dump(doc, allow_unicode=True))))


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.builds("[{}]".format, names),
            st.builds("{} = {}".format, names, st.sampled_from(["1", "1e20", "inf", "nan", "-0", '"x"', "[", "{a=1}",
                                                                "[1, [2]]", "true", "1979-05-27", "0x7f"]) | words),
            words,
        ),
        max_size=8,
    )
)  # fmt: skip
def test_fuzz_toml_texts(lines):
    assert_one_answer(*check(write("doc.toml", GOOD + "\n".join(lines) + "\n")))


@FUZZ
@given(blob=st.binary(max_size=300), suffix=st.sampled_from([".toml", ".yaml"]))
def test_fuzz_random_bytes(blob, suffix):
    assert_one_answer(*check(write("bytes" + suffix, blob)))


@FUZZ
@given(
    overrides=st.lists(
        st.builds("{}={}".format, st.lists(names, min_size=1, max_size=4).map(".".join), words | st.sampled_from(
            ["[", "{", "]", "1e400", ".inf", "!!python/object:os.system", "*a", "&a 1", "'", "[[[[[[1]]]]]]",
             "- 1", "nan", "99999999999999999999999", "{a: {b: c}}", "null"]))
        | words,
        max_size=4,
    )
)  # fmt: skip
def test_fuzz_set_overrides(overrides):
    assert_one_answer(*check(write("good.toml", GOOD), *overrides))
