"""Competitions built from offline data: the digits demo."""
