"""The canonical objects: the :class:`~adaptkit.core.adapter.Adapter` graph, the adapter kinds (pure tensor
math, one file each), and the linear algebra they share."""
