"""What carries the chat, behind the hub's Engine interface (chat/engine.py): memory.py for
one worker alone, redis/ for every worker and host through Redis.

The top of the chat's layers: engines import from chatapp.chat (and the leaf modules),
never from the app; the chat never imports them. The app picks one.
"""
