"""docs/api.md is generated from alpha_jit/api_docs.py and checked against the code here."""

from __future__ import annotations

from pathlib import Path

import pytest

from alpha_jit import api_docs
from alpha_jit.ir.ops import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
# public names that are plumbing, not API (kept public for other alpha_jit modules)
INTERNAL = {"F": {"note_index_bound"}}


def test_every_entry_names_something_that_exists():
    for _, entries in api_docs.SECTIONS:
        for e in entries:
            api_docs.resolve(e.name)  # raises AttributeError for a stale entry


def test_every_public_name_is_documented():
    for prefix in api_docs.NAMESPACES:
        documented = {e.name.split(".", 1)[1] for _, es in api_docs.SECTIONS for e in es
                      if e.name.startswith(prefix + ".")}
        missing = api_docs.public_names(prefix) - documented - INTERNAL.get(prefix, set())
        assert not missing, f"{prefix}: undocumented public names {sorted(missing)}"


def test_every_registered_op_says_what_records_it():
    ops = set(registry.all_ops())
    assert ops - set(api_docs.OP_SOURCES) == set(), "ops missing from api_docs.OP_SOURCES"
    assert set(api_docs.OP_SOURCES) - ops == set(), "OP_SOURCES names ops that do not exist"


def test_no_name_is_listed_twice():
    names = [e.name for _, es in api_docs.SECTIONS for e in es]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_docs_api_md_is_the_rendered_table():
    if not DOC.exists():
        pytest.fail("docs/api.md is missing: python -m alpha_jit.api_docs > docs/api.md")
    assert DOC.read_text() == api_docs.render(), \
        "docs/api.md is stale: python -m alpha_jit.api_docs > docs/api.md"
