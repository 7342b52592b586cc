variable "region" {
  description = "AWS region of the pivot."
  type        = string
  default     = "eu-central-1"
}

variable "name" {
  description = "Name of the pivot; prefixes every resource."
  type        = string
  default     = "burrow"
}

variable "instance_type" {
  description = "EC2 type. One small instance holds 10,000 idle tunnels (docs/benchmarks.md)."
  type        = string
  default     = "t3.small"
}

variable "vpc_id" {
  description = "VPC for the pivot; empty means the default VPC."
  type        = string
  default     = ""
}

variable "subnet_id" {
  description = "Public subnet for the pivot; empty means one of the default VPC."
  type        = string
  default     = ""
}

variable "burrow_url" {
  description = "Where the instance downloads the burrow binary (x86_64 Linux, a release build)."
  type        = string
}

variable "burrow_sha256" {
  description = "SHA-256 of that binary; the instance refuses any other."
  type        = string
}

variable "operator_cidrs" {
  description = "Who may reach the pivot's SSH port (443): operators and devices."
  type        = list(string)
  default     = ["0.0.0.0/0", "::/0"]
}

variable "admin_ssh_cidrs" {
  description = "Who may reach the instance's own sshd on 22, for its admins; empty closes it."
  type        = list(string)
  default     = []
}

variable "key_name" {
  description = "EC2 key pair for the instance's own sshd; empty for none."
  type        = string
  default     = ""
}

variable "use_iot_core" {
  description = "Use AWS IoT Core as the devices' broker instead of the pivot's embedded one."
  type        = bool
  default     = false
}

variable "device_ids" {
  description = "With use_iot_core: devices that get an IoT thing and a certificate."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for id in var.device_ids : can(regex("^[a-z0-9][a-z0-9_-]{0,62}$", id))])
    error_message = "Device ids are 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit."
  }
}

variable "admin_public_key" {
  description = "OpenSSH public key of the first admin operator, registered at first boot."
  type        = string

  validation {
    condition     = can(regex("^(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa) [A-Za-z0-9+/=]+( [A-Za-z0-9@._-]*)?$", var.admin_public_key))
    error_message = "Give one OpenSSH public key line (type, key, an optional plain comment)."
  }
}

variable "admin_name" {
  description = "Name of that first admin operator."
  type        = string
  default     = "admin"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9_-]{0,62}$", var.admin_name))
    error_message = "An operator name is 1-63 characters of a-z, 0-9, '_' and '-'."
  }
}
