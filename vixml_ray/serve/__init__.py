"""Online scoring on Ray Serve: an HTTP service over the sharded label index (:mod:`vixml_ray.serve.app`)."""
