import pytest
import torch

from onebit.data import calibration_ids, load_text, split_text, tokenize


class CharTokenizer:
    """A stand-in tokenizer (one id per character) so data tests need no model."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        class Out:
            input_ids = torch.tensor([[ord(c) % 256 for c in text]])

        return Out()


def test_load_text_from_path_strips_doc_markers(tmp_path):
    f = tmp_path / "t.utf8"
    f.write_text('<doc id="1" title="A">\nHello world.\n</doc>\nMore text.\n', encoding="utf-8")
    text = load_text(str(f))
    assert "<doc" not in text and "</doc>" not in text and "Hello world." in text and "More text." in text


def test_missing_and_empty_sources(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        load_text(str(tmp_path / "nope.txt"))
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(str(tmp_path / "e.txt"))
    monkeypatch.setenv("ONEBIT_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ONEBIT_DATA_DIR"):
        load_text("c4")


def test_corpus_names_resolve_through_data_dir(tmp_path, monkeypatch):
    (tmp_path / "wiki.utf8").write_text("some wiki text\n")
    monkeypatch.setenv("ONEBIT_DATA_DIR", str(tmp_path))
    assert load_text("wiki").strip() == "some wiki text"


def test_calibration_ids_seeded_and_shaped():
    tok = CharTokenizer()
    text = "".join(chr(97 + i % 26) for i in range(5000))
    a = calibration_ids(tok, text, nsamples=8, seqlen=64, seed=0)
    b = calibration_ids(tok, text, nsamples=8, seqlen=64, seed=0)
    c = calibration_ids(tok, text, nsamples=8, seqlen=64, seed=1)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    ids = tokenize(tok, text)
    for row in a:  # every sample is a real window of the text
        s = int(torch.nonzero(ids == row[0])[0])
        assert any(torch.equal(ids[j : j + 64], row) for j in range(s, len(ids) - 63, 26))
    with pytest.raises(ValueError, match="fewer than seqlen"):
        calibration_ids(tok, "short", 1, 64)


def test_split_is_disjoint_and_complete():
    text = "\n".join(f"line {i}" for i in range(100))
    a, b = split_text(text, 0.5)
    assert a + b == text and a and b
