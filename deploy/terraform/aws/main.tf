# A burrow pivot on one EC2 instance: SSH on 443 for operators and devices,
# MQTT over TLS on 8883 for the embedded broker, and an Elastic IP that
# devices and enrollment tokens name.

data "aws_vpc" "default" {
  count   = var.vpc_id == "" ? 1 : 0
  default = true
}

data "aws_subnets" "default" {
  count = var.subnet_id == "" ? 1 : 0
  filter {
    name   = "vpc-id"
    values = [local.vpc_id]
  }
}

# Debian 12, from Debian's own AWS account.
data "aws_ami" "debian" {
  most_recent = true
  owners      = ["136693071363"]
  filter {
    name   = "name"
    values = ["debian-12-amd64-*"]
  }
  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

locals {
  vpc_id      = var.vpc_id != "" ? var.vpc_id : data.aws_vpc.default[0].id
  subnet_id   = var.subnet_id != "" ? var.subnet_id : data.aws_subnets.default[0].ids[0]
  ipv4_cidrs  = [for c in var.operator_cidrs : c if !strcontains(c, ":")]
  ipv6_cidrs  = [for c in var.operator_cidrs : c if strcontains(c, ":")]
  server_unit = file("${path.module}/../../systemd/burrow-server.service")
  sysusers    = file("${path.module}/../../systemd/burrow.sysusers")
}

resource "aws_security_group" "pivot" {
  name        = "${var.name}-pivot"
  description = "burrow pivot: SSH on 443, MQTT over TLS on 8883"
  vpc_id      = local.vpc_id

  ingress {
    description      = "burrow SSH (operators and devices)"
    from_port        = 443
    to_port          = 443
    protocol         = "tcp"
    cidr_blocks      = local.ipv4_cidrs
    ipv6_cidr_blocks = local.ipv6_cidrs
  }

  dynamic "ingress" {
    for_each = var.use_iot_core ? [] : [1]
    content {
      description      = "devices' MQTT over TLS (embedded broker)"
      from_port        = 8883
      to_port          = 8883
      protocol         = "tcp"
      cidr_blocks      = ["0.0.0.0/0"]
      ipv6_cidr_blocks = ["::/0"]
    }
  }

  dynamic "ingress" {
    for_each = length(var.admin_ssh_cidrs) > 0 ? [1] : []
    content {
      description = "the instance's own sshd, for its admins"
      from_port   = 22
      to_port     = 22
      protocol    = "tcp"
      cidr_blocks = var.admin_ssh_cidrs
    }
  }

  egress {
    description      = "anywhere: package mirrors, the binary, IoT Core"
    from_port        = 0
    to_port          = 0
    protocol         = "-1"
    cidr_blocks      = ["0.0.0.0/0"]
    ipv6_cidr_blocks = ["::/0"]
  }
}

resource "aws_eip" "pivot" {
  domain = "vpc"
  tags = {
    Name = "${var.name}-pivot"
  }
}

resource "aws_instance" "pivot" {
  ami                    = data.aws_ami.debian.id
  instance_type          = var.instance_type
  subnet_id              = local.subnet_id
  vpc_security_group_ids = [aws_security_group.pivot.id]
  key_name               = var.key_name != "" ? var.key_name : null

  metadata_options {
    http_tokens = "required"
  }

  root_block_device {
    encrypted   = true
    volume_size = 16
  }

  user_data = templatefile("${path.module}/user_data.sh.tftpl", {
    burrow_url    = var.burrow_url
    burrow_sha256 = var.burrow_sha256
    advertise     = "${aws_eip.pivot.public_ip}:443"
    server_unit   = local.server_unit
    sysusers      = local.sysusers
    mqtt_url      = var.use_iot_core ? "mqtts://${data.aws_iot_endpoint.mqtt[0].endpoint_address}:8883" : ""
    admin_name    = var.admin_name
    admin_key     = var.admin_public_key
  })
  user_data_replace_on_change = true

  tags = {
    Name = "${var.name}-pivot"
  }
}

resource "aws_eip_association" "pivot" {
  instance_id   = aws_instance.pivot.id
  allocation_id = aws_eip.pivot.id
}
