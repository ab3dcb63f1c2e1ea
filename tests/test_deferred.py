"""Deferred attributes: computed on first read, once; a plain value is kept as it is."""
from functools import partial

from ds_smoes.core.deferred import Deferred


class Holder:
    figure = Deferred()


def test_a_partial_runs_on_first_read_only():
    calls = []
    holder = Holder()
    assert holder.figure is None  # nothing stored yet
    holder.figure = partial(lambda x: calls.append(x) or x * 2, 21)
    assert calls == []  # not computed when set
    assert holder.figure == 42 and holder.figure == 42
    assert calls == [21]  # computed once
    holder.figure = 7  # a plain value replaces it
    assert holder.figure == 7 and calls == [21]
    assert isinstance(Holder.figure, Deferred)
