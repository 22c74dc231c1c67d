"""The planner: a cost model (``costs``: the measured table; ``model``: step time and memory of a
layout), the search over layouts (``search``: ``torch_mp.plan``) and its application
(``apply``: ``torch_mp.parallelize``)."""
