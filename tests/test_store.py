"""The workdir's files: atomic JSON, JSONL that survives a torn line, no NaN, a full disk."""

import errno
import json
import logging
import os

import pytest

from rcnas_jax.runtime import store


def test_json_round_trip_and_atomic_replace(tmp_path):
  path = str(tmp_path / "sub" / "a.json")
  assert store.read_json(path, {"missing": True}) == {"missing": True}
  store.write_json(path, {"b": [1, 2], "a": 0.1})
  store.write_json(path, {"b": [3]})
  assert store.read_json(path) == {"b": [3]}
  assert os.listdir(tmp_path / "sub") == ["a.json"]  # No temporary file is left behind.


def test_non_finite_numbers_never_reach_a_file(tmp_path):
  path = tmp_path / "cache.jsonl"
  store.append_jsonl(str(path), [{"reward": 0.5}])
  for bad in (float("nan"), float("inf")):
    with pytest.raises(store.StoreError, match="non-finite"):
      store.append_jsonl(str(path), [{"reward": bad}])
    with pytest.raises(store.StoreError, match="non-finite"):
      store.write_json(str(tmp_path / "a.json"), {"lips": bad})
  assert store.read_jsonl(str(path)) == [{"reward": 0.5}]
  assert not (tmp_path / "a.json").exists()


@pytest.mark.parametrize("cut", [1, 7, 11])
def test_a_torn_last_line_is_dropped_with_a_warning_and_cut_off(tmp_path, caplog, cut):
  path = tmp_path / "log.jsonl"
  store.append_jsonl(str(path), [{"i": 0}, {"i": 1}, {"text": "a longer record"}])
  whole = path.read_bytes()
  lines = whole.split(b"\n")
  path.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:cut])  # A kill mid-write.
  with caplog.at_level(logging.WARNING):
    assert store.read_jsonl(str(path)) == [{"i": 0}, {"i": 1}]
  assert "torn last line" in caplog.text
  store.append_jsonl(str(path), [{"i": 2}])  # Starts on a fresh line.
  assert store.read_jsonl(str(path)) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_a_last_line_without_its_newline_is_torn_even_when_it_parses(tmp_path):
  path = tmp_path / "log.jsonl"
  path.write_text('{"i": 0}\n{"i": 1}')
  assert store.read_jsonl(str(path)) == [{"i": 0}]
  assert path.read_text() == '{"i": 0}\n'


def test_damage_inside_a_file_is_an_error_naming_the_line(tmp_path):
  path = tmp_path / "log.jsonl"
  path.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
  with pytest.raises(store.StoreError, match=r"log.jsonl:2 is not a JSON line"):
    store.read_jsonl(str(path))
  (tmp_path / "a.json").write_text("{")
  with pytest.raises(store.StoreError, match="a.json is not valid JSON"):
    store.read_json(str(tmp_path / "a.json"))


def _full_disk(monkeypatch, after_bytes: int):
  """Makes every file write fail with ENOSPC once `after_bytes` more bytes were written."""
  real_open = open
  budget = [after_bytes]

  class FullFile:
    def __init__(self, f):
      self.f = f

    def write(self, text):
      if len(text) > budget[0]:
        self.f.write(text[:budget[0]])  # A partial write, as a filling disk leaves.
        self.f.flush()
        budget[0] = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      budget[0] -= len(text)
      return self.f.write(text)

    def __getattr__(self, name):
      return getattr(self.f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

  def opener(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    return FullFile(f) if any(m in mode for m in "wa") else f

  monkeypatch.setattr("builtins.open", opener)


def test_a_full_disk_gives_a_clear_error_and_keeps_the_last_good_state(tmp_path, monkeypatch):
  json_path, jsonl_path = str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")
  store.write_json(json_path, {"good": 1})
  store.append_jsonl(jsonl_path, [{"good": 1}])
  _full_disk(monkeypatch, after_bytes=5)
  with pytest.raises(store.StoreError) as error:
    store.write_json(json_path, {"new": "x" * 100})
  assert str(error.value) == (f"could not write {json_path}: the disk is full (errno 28); the "
                              "previous version is intact")
  with pytest.raises(store.StoreError, match="the disk is full"):
    store.append_jsonl(jsonl_path, [{"new": "x" * 100}])
  monkeypatch.undo()
  assert store.read_json(json_path) == {"good": 1}
  assert store.read_jsonl(jsonl_path) == [{"good": 1}]  # The partial line was rolled back.
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.jsonl"]


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(store, "is_writer", lambda: False)
  store.write_json(str(tmp_path / "a.json"), {"a": 1})
  store.append_jsonl(str(tmp_path / "b.jsonl"), [{"a": 1}])
  store.write_text(str(tmp_path / "c.md"), "x")
  assert os.listdir(tmp_path) == []


def test_write_jsonl_replaces_the_whole_file(tmp_path):
  path = str(tmp_path / "log.jsonl")
  store.append_jsonl(path, [{"i": 0}, {"i": 1}])
  store.write_jsonl(path, [{"i": 0}])
  assert [json.loads(line) for line in open(path)] == [{"i": 0}]
