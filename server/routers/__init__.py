"""The API's routers: handlers validate the request and delegate to the services."""
