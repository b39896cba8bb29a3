"""The tokenizer and vocab against torchtext's rules, reproduced in agnews.text.basic_english."""

import json
from collections import Counter

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agnews.text import Vocab, basic_english, count_tokens, sum_counts, tokenize

# Pieces that exercise every rule: each punctuation mark, <br />, quotes, case, whitespace.
TRICKY = [
    "Hello, World!",
    "It's a dog's life... isn't it?",
    'He said "no" (twice); then: yes.',
    "line one<br />line two<BR />three <br/> four",
    '<br "/>joined by a removed quote',
    "<br\t/>tab is not a space",
    "  leading and trailing   ",
    "",
    "   ",
    '"""',
    "tabs\tand\nnewlines\r\nand\x0bvt\x0cff\x1cfs\x1dgs\x1ers\x1fus\x85nel\xa0nbsp\u2028ls",
    "\u3000ideographic\u2003em space\u200bzero width",
    "İstanbul ΣΊΣΥΦΟΣ ΟΔΟΣ Straße ǅemal ﬁne",
    "ὈΔΥΣΣΕΎΣ final sigma: ΑΣ Σ ΑΣ. ΑΣ'",
    "3.14 U.S. $1,000,000 e-mail user@example.com #39;s &lt;b&gt;",
    "Ünïcödé ÀÉÎÕÜ ÅNGSTRÖM ǈ Ǉ",
    "emoji 🎉🎉 and CJK 新闻 and عربي",
    "\x00nul\x01ctrl\x7fdel",
]


def test_reference_is_torchtext_basic_english():
    # torchtext 0.18's documented example, and its rules applied by hand.
    assert basic_english("You can now install TorchText using pip!") == [
        "you",
        "can",
        "now",
        "install",
        "torchtext",
        "using",
        "pip",
        "!",
    ]
    assert basic_english('Don\'t (x), y; z: "q".') == [
        "don",
        "'",
        "t",
        "(",
        "x",
        ")",
        ",",
        "y",
        "z",
        "q",
        ".",
    ]


@pytest.mark.parametrize("text", TRICKY)
def test_tokenize_equals_reference_on_tricky_text(text):
    assert tokenize(pa.array([text])).to_pylist() == [basic_english(text)]


def test_tokenize_keeps_nulls_and_row_count():
    got = tokenize(pa.chunked_array([["a b", None], ["", "C."]]))
    assert got.to_pylist() == [["a", "b"], None, [], ["c", "."]]


def test_whitespace_split_matches_python_isspace_for_every_code_point():
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = pa.array([f"a{c}b" for c in chars])
    got = tokenize(texts).to_pylist()
    wrong = [hex(ord(c)) for c, toks in zip(chars, got) if toks != basic_english(f"a{c}b")]
    assert wrong == []


def test_lowercase_matches_python_for_every_code_point():
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = pa.array([f"x{c}Σ" for c in chars])
    got = tokenize(texts).to_pylist()
    wrong = [hex(ord(c)) for c, toks in zip(chars, got) if toks != basic_english(f"x{c}Σ")]
    assert wrong == []


TEXT_ALPHABET = st.one_of(
    st.characters(codec="utf-8"),
    st.sampled_from(list("'\".,()!?;:<>/br BR\t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000ΣσςİI")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=TEXT_ALPHABET, max_size=60), min_size=1, max_size=20))
def test_tokenize_equals_reference_on_arbitrary_unicode(texts):
    assert tokenize(pa.array(texts)).to_pylist() == [basic_english(t) for t in texts]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(["<br />", "<BR />", '"', " ", "<br", " />", "'", "x"]), max_size=30)
)
def test_br_and_quote_interplay(parts):
    text = "".join(parts)
    assert tokenize(pa.array([text])).to_pylist() == [basic_english(text)]


def torchtext_vocab(token_lists, min_freq=1, max_tokens=None, specials=("<pad>", "<unk>")):
    """torchtext 0.18 build_vocab_from_iterator + vocab(), line for line, in Python."""
    counter = Counter()
    for tokens in token_lists:
        counter.update(tokens)
    ordered = sorted(counter.items(), key=lambda x: (-x[1], x[0]))
    if max_tokens is not None:
        ordered = ordered[: max_tokens - len(specials)]
    ordered = dict(ordered)
    for s in specials:
        ordered.pop(s, None)
    return list(specials) + [t for t, f in ordered.items() if f >= min_freq]


CORPUS = [
    "The cat sat on the mat.",
    "The dog ate the cat's food!",
    "b a c a b a",
    "Zebra zebra apple Apple <unk> <pad> <unk>",
    "ünïcode Über über uber",
]


@pytest.mark.parametrize("min_freq,max_size", [(1, None), (2, None), (1, 5), (2, 6), (1, 3)])
def test_vocab_order_equals_torchtext(min_freq, max_size):
    tokens = tokenize(pa.array(CORPUS))
    vocab = Vocab.from_counts(count_tokens(tokens), min_freq=min_freq, max_size=max_size)
    expected = torchtext_vocab([basic_english(t) for t in CORPUS], min_freq, max_size)
    assert list(vocab.itos) == expected


def test_counts_summed_across_blocks_equal_one_count():
    blocks = [tokenize(pa.array(CORPUS[:2])), tokenize(pa.array(CORPUS[2:]))]
    summed = sum_counts([count_tokens(b) for b in blocks])
    whole = count_tokens(tokenize(pa.array(CORPUS)))
    as_dict = lambda t: dict(zip(t["token"].to_pylist(), t["count"].to_pylist()))  # noqa: E731
    assert as_dict(summed) == as_dict(whole)
    assert sum_counts([]).num_rows == 0


def test_encode_unknown_truncation_and_specials():
    vocab = Vocab.from_counts(count_tokens(tokenize(pa.array(CORPUS))))
    stoi = vocab.stoi
    ids = vocab.encode(tokenize(pa.array(["the cat NEVERSEEN <unk> <pad>", None, ""])), max_len=4)
    assert ids.type == pa.list_(pa.int32())
    assert ids.to_pylist() == [[stoi["the"], stoi["cat"], 1, 1], None, []]
    full = vocab.encode_texts(pa.array(["the cat NEVERSEEN <unk> <pad>"]))
    assert full.to_pylist()[0][-1] == 0  # "<pad>" in the text is the pad id, as in torchtext


def test_vocab_save_load_round_trip(tmp_path):
    vocab = Vocab.from_counts(count_tokens(tokenize(pa.array(CORPUS))), min_freq=1, max_size=10)
    path = vocab.save(tmp_path / "vocab.json")
    data = json.loads(path.read_text())
    assert data["itos"] == list(vocab.itos) and data["tokenizer"] == "basic_english"
    assert Vocab.load(path) == vocab


def test_vocab_load_refuses_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vocabulary file"):
        Vocab.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        Vocab.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"itos": ["a", "b"]}))
    with pytest.raises(ValueError, match="<pad>, <unk>"):
        Vocab.load(tmp_path / "other.json")


def test_vocab_rejects_bad_parameters():
    counts = count_tokens(tokenize(pa.array(CORPUS)))
    with pytest.raises(ValueError, match="max_size"):
        Vocab.from_counts(counts, max_size=1)
    with pytest.raises(ValueError, match="min_freq"):
        Vocab.from_counts(counts, min_freq=0)
