"""Conversations: the chat template and its loss mask, ``generate_reply``, and the terminal chat."""
