"""A generated sequence's text, decoded as its tokens come: each step decodes only the new token
(tokenizers' `DecodeStream`, which holds back the bytes of a character split over several tokens), and
the text always equals the whole sequence decoded at once, as `tokenizer.decode` writes it."""

from tokenizers.decoders import DecodeStream


class Detokenizer:
    """The text of the tokens `add`ed so far (special tokens skipped)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)  # tokenizers' Rust tokenizer, when it has one
        self._backend, self._stream = backend, DecodeStream(skip_special_tokens=True) if backend else None
        self.token_ids: list[int] = []
        self.text = ""
        self._held = False  # the last token's bytes are not a whole character yet

    def add(self, token: int) -> str:
        """Read one token; the text it completes (empty while a character is still partial)."""
        self.token_ids.append(token)
        if self._stream is not None:
            new = self._stream.step(self._backend, token) or ""
        else:  # a tokenizer without a Rust backend: the whole text again, the new end kept when whole
            whole = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            new = "" if whole.endswith("\ufffd") else whole[len(self.text):]
        self._held = not new
        self.text += new
        return new

    def finish(self) -> str:
        """The whole text once no token follows: with what a partial last character decodes to (a
        replacement character, as `decode` writes it)."""
        if self._held:
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            self._held = False
        return self.text
