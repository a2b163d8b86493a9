"""Nightly per-user LoRA training: data from reactions, training, the gate, promotion.

``job`` runs in the bot's process (database, lock, decisions); ``worker`` runs in a
child process with few threads (the model, TRL, peft), so the bot keeps answering.
"""
