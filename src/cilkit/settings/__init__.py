"""What a run is asked to do: the typed config (``config``), what each key does to the numbers
(``keys``), ``--set`` and a method's own protocol keys and memory (``overrides``), a method
option declared once on its field (``options``), the registries of the
names a config may use (``registry``), the user's plugins (``plugins``) and the packaged
configs (``packaged``).

May import: ``cilkit.common``.
"""
