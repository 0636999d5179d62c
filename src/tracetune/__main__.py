from tracetune.cli import entry

entry()
