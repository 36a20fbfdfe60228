"""Flower ClientApp of fed-dfkd: hosts one teacher and answers rounds (``client.app:app``)."""
