from data_pipeline.text_tokenizer import TextTokenizer


def test_text_tokenizer_has_byte_fallback(world):
    tok = TextTokenizer(world / "tok" / "text_tokenizer.model")
    assert tok.vocab_size == 400
    for text in ["two red squares on the left", "Ünïcødé 猫 🙂", "4*4"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("three blue circles")) < len("three blue circles") // 2  # merges learned
