"""agnews: an LSTM news-topic classifier for AG_NEWS and news archives, on Ray."""

__version__ = "0.1.0"
