output "pivot_address" {
  description = "HOST:PORT for `burrow login` and for devices (`--pivot`)."
  value       = "${aws_eip.pivot.public_ip}:443"
}

output "iot_endpoint" {
  description = "With use_iot_core: the broker for `--mqtt-url mqtts://ENDPOINT:8883`."
  value       = var.use_iot_core ? data.aws_iot_endpoint.mqtt[0].endpoint_address : null
}

output "device_certificates" {
  description = "With use_iot_core: each device's certificate and key (PEM), for `--mqtt-cert` and `--mqtt-key`."
  value = {
    for id, c in aws_iot_certificate.device : id => {
      certificate = c.certificate_pem
      private_key = c.private_key
    }
  }
  sensitive = true
}

output "pivot_certificate" {
  description = "With use_iot_core: the pivot's certificate and key (PEM), for its --mqtt-cert and --mqtt-key."
  value = var.use_iot_core ? {
    certificate = aws_iot_certificate.pivot[0].certificate_pem
    private_key = aws_iot_certificate.pivot[0].private_key
  } : null
  sensitive = true
}
