"""ringfence shared vhost-user backend: protocol, guest memory, virtqueues, devices."""
