"""One name per concept: ``kernel``, ``tolerance``, ``coreset_ratio`` everywhere, the old spellings
(``backend``, ``radius``, ``ratio``) still working for one release with a DeprecationWarning."""
import argparse
import warnings

import numpy as np
import pytest

from dinopatch import kernels, params
from dinopatch.bank import MemoryBank
from dinopatch.bench.cli import parser as bench_parser
from dinopatch.cli import build_parser
from dinopatch.old_names import OLD_NAMES

NEW_FLAGS = {"kernel": "--kernel", "tolerance": "--tolerance", "coreset_ratio": "--coreset-ratio"}


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 12, 8), dtype=np.float32), rng.standard_normal((12, 5, 8), dtype=np.float32)


def old(name: str):
    return pytest.warns(DeprecationWarning, match=f"'{name}' is the old name of '{OLD_NAMES.get(name, 'KERNELS')}'")


def test_the_new_names_work_without_a_warning(data):
    q, b = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = kernels.min_distance(q, b, kernel="numpy", grid=(3, 4), tolerance=1)
        assert kernels.kcenter_greedy(b, 2, kernel="numpy").shape == (12, 2)
        assert kernels.resolve(kernel="numpy") == "numpy" and "numpy" in kernels.KERNELS
        bank = MemoryBank.fit(b.transpose(1, 0, 2).reshape(5, 3, 4, 8), coreset_ratio=0.6, tolerance=1,
                              kernel="numpy")
        assert bank.tolerance == bank.max_tolerance == 1 and bank.size == 3
    # One step of tolerance finds rows a bank without it misses: the keyword is not ignored.
    assert (got <= kernels.min_distance(q, b, "numpy")).all() and (got < kernels.min_distance(q, b, "numpy")).any()


def test_old_keywords_warn_and_give_the_same_answers(data):
    q, b = data
    want = kernels.min_distance(q, b, "numpy", grid=(3, 4), tolerance=1)
    with old("radius"):
        np.testing.assert_array_equal(kernels.min_distance(q, b, "numpy", grid=(3, 4), radius=1), want)
    with old("backend"):
        np.testing.assert_array_equal(kernels.min_distance(q, b, backend="numpy", grid=(3, 4), tolerance=1), want)
    with old("radius"):
        np.testing.assert_array_equal(kernels.min_distance_numpy(q, b, grid=(3, 4), radius=1), want)
    with old("backend"):
        np.testing.assert_array_equal(kernels.kcenter_greedy(b, 2, backend="numpy"),
                                      kernels.kcenter_greedy(b, 2, "numpy"))
    with old("backend"):
        assert kernels.resolve(backend="numpy") == "numpy"
    with old("BACKENDS"):
        assert kernels.BACKENDS == kernels.KERNELS


def test_the_bank_takes_and_shows_its_old_names(data):
    _, b = data
    tokens = b.transpose(1, 0, 2).reshape(5, 3, 4, 8)
    want = MemoryBank.fit(tokens, coreset_ratio=0.6, tolerance=1, kernel="numpy")
    with old("ratio"), old("radius"), old("backend"):
        bank = MemoryBank.fit(tokens, ratio=0.6, radius=1, backend="numpy")
    np.testing.assert_array_equal(bank.features, want.features)
    assert bank.tolerance == 1
    with old("radius"):
        assert MemoryBank(want.features, (3, 4), radius=1).tolerance == 1
    with old("radius"):
        assert bank.radius == 1
    with pytest.warns(DeprecationWarning, match="'max_radius' is the old name of 'max_tolerance'"):
        assert bank.max_radius == 1
    with old("backend"):
        np.testing.assert_array_equal(bank.distances(tokens[:2], backend="numpy"), want.distances(tokens[:2], "numpy"))


def test_both_spellings_at_once_is_an_error(data):
    q, b = data
    with pytest.raises(TypeError, match="both 'tolerance' and its old name 'radius'"):
        kernels.min_distance(q, b, "numpy", grid=(3, 4), tolerance=1, radius=1)
    with pytest.raises(TypeError, match="both 'coreset_ratio' and its old name 'ratio'"):
        MemoryBank.fit(b.transpose(1, 0, 2).reshape(5, 3, 4, 8), coreset_ratio=0.5, ratio=0.5)


def _flags(parser: argparse.ArgumentParser) -> dict[str, dict[str, list[str]]]:
    """``{command: {dest: option strings}}`` of a parser and its subcommands."""
    subs = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    out = {"": {a.dest: a.option_strings for a in parser._actions}}
    for name, sub in subs.items():
        out[name] = {a.dest: a.option_strings for a in sub._actions}
    return out


def test_the_table_and_every_command_use_the_one_name():
    table = params.table()
    assert {name: table[name].flag for name in NEW_FLAGS} == NEW_FLAGS
    assert table["kernel"].rule.choices == ("auto", *kernels.KERNELS)
    seen = 0
    for command, dests in {**_flags(build_parser()), **{f"bench {k}": v for k, v in _flags(bench_parser()).items()}
                           }.items():
        for dest, options in dests.items():
            assert dest not in OLD_NAMES, (command, dest)
            assert not {f"--{name}" for name in OLD_NAMES} & set(options), (command, options)
            if dest in NEW_FLAGS:
                assert options == [NEW_FLAGS[dest]], (command, dest, options)
                seen += 1
    assert seen >= 3  # fit has all three
