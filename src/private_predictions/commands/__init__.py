"""The series' command-line programs, one module each: ``python -m private_predictions.commands.NAME``.

* ``server CONFIG NAME``: one of the three TF Encrypted servers, on each machine of a deployment;
* ``serve CONFIG``: the model owner's side: share the trained model and serve private queries;
* ``predict CONFIG``: a client: private predictions for MNIST test images.
"""
