"""modules/sd_hijack.py: model_hijack.get_prompt_lengths (L324-333), the token counter's
count: the prompt's tokens without start and end tokens (the double's encoder counts words)."""
from modules import shared


class _ModelHijack:
    def get_prompt_lengths(self, text):
        count = shared.sd_model.token_count(text)
        return count, max(75, -(-count // 75) * 75)


model_hijack = _ModelHijack()
