"""umT5 tokenizer wrapper: cleaning, EOS, padding, truncation, file errors."""

from __future__ import annotations

import pytest
from _text_helpers import WORD_ID, build_tiny_tokenizer

from rf_core.text import UMT5Tokenizer, clean_prompt


@pytest.fixture
def tokenizer_file(tmp_path):
    return build_tiny_tokenizer(tmp_path / "google" / "umt5-xxl" / "tokenizer.json")


def test_ids_eos_padding_and_mask(tokenizer_file):
    ids, mask = UMT5Tokenizer(tokenizer_file)(["a cat runs on the grass", "red dog"])
    assert ids.shape == mask.shape == (2, 512)
    words = ["a", "cat", "runs", "on", "the", "grass"]
    assert ids[0, :7].tolist() == [WORD_ID[w] for w in words] + [1]  # EOS id 1 appended
    assert ids[1, :3].tolist() == [WORD_ID["red"], WORD_ID["dog"], 1]
    assert (ids[0, 7:] == 0).all() and (ids[1, 3:] == 0).all()  # pad id 0
    assert mask.sum(1).tolist() == [7, 3]  # words + EOS
    assert (mask[0, :7] == 1).all() and (mask[0, 7:] == 0).all()


def test_single_string_and_custom_length(tokenizer_file):
    ids, mask = UMT5Tokenizer(tokenizer_file, max_length=4)("the cat")
    assert ids.tolist() == [[WORD_ID["the"], WORD_ID["cat"], 1, 0]]
    assert mask.tolist() == [[1, 1, 1, 0]]


def test_truncation_keeps_eos_last(tokenizer_file):
    ids, mask = UMT5Tokenizer(tokenizer_file)(["cat " * 600])
    assert (ids[0, :511] == WORD_ID["cat"]).all()
    assert ids[0, 511].item() == 1
    assert mask.sum().item() == 512


def test_cleaning_whitespace_and_double_html_unescape(tokenizer_file):
    assert clean_prompt("  a &amp;amp; b\n\t\tc  ") == "a & b c"
    assert clean_prompt("red&nbsp;dog") == "red dog"  # the no-break space counts as whitespace
    tok = UMT5Tokenizer(tokenizer_file)
    a, _ = tok(["  a   cat\n runs "])
    b, _ = tok(["a cat runs"])
    assert a.tolist() == b.tolist()
    raw, _ = UMT5Tokenizer(tokenizer_file, clean=False)(["a &amp;amp; b"])
    cleaned, _ = tok(["a &amp;amp; b"])
    assert cleaned[0, :4].tolist() == [WORD_ID["a"], WORD_ID["&"], WORD_ID["b"], 1]
    assert raw[0, :4].tolist() != cleaned[0, :4].tolist()


def test_directory_is_accepted(tokenizer_file):
    a, _ = UMT5Tokenizer(tokenizer_file.parent)(["a dog"])
    b, _ = UMT5Tokenizer(tokenizer_file)(["a dog"])
    assert a.tolist() == b.tolist()


def test_file_errors(tmp_path):
    (tmp_path / "only_spm").mkdir()
    (tmp_path / "only_spm" / "spiece.model").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"only_spm: no tokenizer\.json.*spiece\.model"):
        UMT5Tokenizer(tmp_path / "only_spm")
    with pytest.raises(FileNotFoundError, match="not found"):
        UMT5Tokenizer(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: cannot read tokenizer"):
        UMT5Tokenizer(tmp_path / "broken.json")
    no_eos = build_tiny_tokenizer(tmp_path / "no_eos.json", with_eos=False)
    with pytest.raises(ValueError, match=r"no_eos\.json: tokenizer has no '</s>' token"):
        UMT5Tokenizer(no_eos)
    assert UMT5Tokenizer(no_eos, eos_id=1)(["a"])[0][0, :2].tolist() == [WORD_ID["a"], 1]
