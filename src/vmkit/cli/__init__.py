"""Command-line front end: parse, call the engine, render. No VM logic lives here."""
