"""A live session: the pump between the two sockets, policy, codec and event inspection."""
