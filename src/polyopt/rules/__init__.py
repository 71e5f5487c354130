"""The optimizer math: one module per family, each a :class:`polyopt._base.Rule`
(the update of one array, written with array-API operations) and its factories."""
