import pytest


@pytest.mark.parametrize(
    "text",
    [
        "a red striped circle in the top left",
        "a photo of sks dog",
        "zxqv qwertyuiop",
        "ünïcödé café 北京 🚀✨",
        "",
        "   multiple    spaces\tand\nnewlines  ",
        "punctuation!?;: (parens) [brackets] 123 4.5",
    ],
)
def test_any_text_tokenizes_without_unknown_collapse(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    inner = ids[1:-1]
    # The unknown token is <|endoftext|>: it must never stand in for a piece of text.
    assert tokenizer.eos_token_id not in inner and tokenizer.bos_token_id not in inner
    decoded = tokenizer.decode(inner).replace(" ", "")
    assert decoded == "".join(text.lower().split())


def test_rare_word_splits_into_subwords(tokenizer):
    pieces = tokenizer.tokenize("sks")
    assert len(pieces) >= 2 and pieces[-1].endswith("</w>")
    # Caption words and common English words are single tokens: the BPE learned them.
    assert len(tokenizer.tokenize("circle")) == 1
    assert [len(tokenizer.tokenize(w)) for w in ("photo", "picture", "quality")] == [1, 1, 1]


def test_fillers_leave_room_for_the_attributes(tokenizer):
    prompt = ("a photo of a large red striped circle in the upper left corner on a white background, "
              "high quality, highly detailed, trending on artstation, award winning, digital art")
    assert len(tokenizer(prompt).input_ids) < tokenizer.model_max_length


def test_long_text_is_truncated_to_model_length(tokenizer):
    ids = tokenizer("a red circle " * 100, truncation=True, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == tokenizer.model_max_length == 77
