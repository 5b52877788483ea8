"""The generated tokenizer: every grammar word is one token; any text still tokenizes."""

from prefalign.models.text import build_tokenizer, tokenizer_files

WORDS = ["a", "red", "green", "gray", "background", "at", "the", "top", "left", "triangle"]


def test_each_word_is_one_token():
    tok = build_tokenizer(WORDS)
    for word in WORDS:
        assert tok.tokenize(word) == [f"{word}</w>"], word


def test_prompt_tokenizes_word_by_word_and_round_trips():
    tok = build_tokenizer(WORDS)
    text = "a red triangle at the top left on a gray background"
    tokens = tok.tokenize(text)
    assert len(tokens) > len(text.split()) - 1  # "on" is not in WORDS: spelled by characters
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True).strip() == text


def test_files_are_deterministic():
    assert tokenizer_files(WORDS) == tokenizer_files(list(reversed(WORDS)))


def test_save_and_reload_offline(tmp_path):
    from transformers import CLIPTokenizer

    tok = build_tokenizer(WORDS)
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(again) == len(tok) > 2
    assert again("a red triangle").input_ids == tok("a red triangle").input_ids


def test_every_grammar_prompt_fits_the_demo_tokenizer_untruncated():
    from prefalign.world.grammar import all_attributes, prompt_of, vocabulary_words

    tok = build_tokenizer(vocabulary_words())
    longest = max((tok(prompt_of(a)).input_ids for a in all_attributes()), key=len)
    assert len(longest) <= tok.model_max_length
    assert longest[-1] == tok.eos_token_id
