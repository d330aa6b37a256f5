"""NATS: the client (``client``), the request server (``server``), the catalogue of streams, subjects and
headers (``subjects``), stream limits (``streams``), discovery, credentials (``auth``) and the users'
permissions (``permissions``). The streams themselves are declared by the services that own them."""
