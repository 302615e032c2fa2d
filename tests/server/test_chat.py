"""Documents registered as chat messages."""

from sglang_am.server.chat import common_prefix


def test_the_chat_document_is_what_every_probe_render_shares():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == [1, 2]
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2, 3]
    assert common_prefix([[5, 1], [6, 1]]) == []
