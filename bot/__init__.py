"""The Discord front end: a thin adapter from Discord threads to the agent's stored conversations.

``app`` holds the bot and the whole message flow; ``turn`` runs one request in a thread; ``commands`` the
slash commands; the other modules are the parts they use (text splitting, limits, status, files).
"""
