"""The ``atoll`` command line. The app itself is built in :mod:`atoll.cli.main` so that plugins'
command modules may import the shared helpers here without loading every other plugin's."""
