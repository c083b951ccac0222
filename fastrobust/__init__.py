"""fastrobust: fast, trustworthy adversarial training and evaluation (D-TRADES, TRADES, MART, FAAL)."""
__version__ = "0.1.0"
