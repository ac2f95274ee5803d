from data_pipeline.text_tokenizer import TextTokenizer


def test_text_tokenizer_has_byte_fallback(world):
    tok = TextTokenizer(world / "tok" / "text_tokenizer.model")
    assert tok.vocab_size == 400
    for text in ["two red squares on the left", "Ünïcødé 猫 🙂", "4*4"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("three blue circles")) < len("three blue circles") // 2  # merges learned


def test_text_tokenizer_keeps_code_whitespace_exactly(world):
    """Indentation, blank lines, tabs, trailing spaces and CRLF survive encode/decode: segments are encoded with
    identity normalization and no whitespace folding, the tokenizer is trained the same way (byte fallback for
    characters it never saw, such as the newline in the shapes world's one-line captions)."""
    tok = TextTokenizer(world / "tok" / "text_tokenizer.model")
    code = "def area(r):\n    if r < 0:\n\n\t\traise ValueError(r)  \n    return 3.14 * r * r\r\n\n# end  \n"
    assert tok.decode(tok.encode(code)) == code
    pieces = tok.sp.id_to_piece(tok.encode("a\n\n  b"))
    assert pieces.count("<0x0A>") == 2 and "".join(pieces).count("▁") == 2
