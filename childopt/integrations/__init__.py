"""Integrations of childopt with training frameworks."""
