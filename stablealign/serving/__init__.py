"""The service framework: a service's life (``service``: connect, build, serve, drain), its gRPC server
(``rpc``, ``tls``, ``grpc_authz``) and the settings every service reads (``settings``)."""
