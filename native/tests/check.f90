! Test driver (tests/test_native.py), the Fortran twin of check.cpp: a wrong path, shape and dtype fail with a
! status and a message, then the real run writes its output.
!   caldera_check_f90 MODEL DEVICE X.bin d0,d1,... Y.bin e0,e1,...   (C-order shapes, rank 2 or 4)
program check
  use, intrinsic :: iso_fortran_env, only: real32, real64
  use caldera
  implicit none
  type(caldera_model) :: model, missing
  character(len=4096) :: path, device, xfile, yfile, xarg, yarg
  integer :: xs(8), ys(8), nx, ny, status, u
  real(real32), allocatable :: x2(:,:), y2(:,:), x4(:,:,:,:), y4(:,:,:,:), bad4(:,:,:,:), bad2(:,:)
  real(real64), allocatable :: d2(:,:), d4(:,:,:,:), e2(:,:), e4(:,:,:,:)
  character(len=:), allocatable :: text

  call get_command_argument(1, path)
  call get_command_argument(2, device)
  call get_command_argument(3, xfile)
  call get_command_argument(4, xarg)
  call get_command_argument(5, yfile)
  call get_command_argument(6, yarg)
  call parse(xarg, xs, nx)
  call parse(yarg, ys, ny)

  status = caldera_load(missing, "/nonexistent/export_dir", trim(device))
  print '(a, i0, 1x, a)', 'error path ', status, caldera_last_error()
  status = caldera_load(model, trim(path), trim(device))
  if (status /= CALDERA_OK) then
    print '(a, i0, 1x, a)', 'failed ', status, caldera_last_error()
    error stop 1
  end if
  ! The package metadata: what export recorded (caldera.format, and the heat run's span), or a status and a line.
  status = caldera_metadata(model, "caldera.format", text)
  print '(a, i0, 1x, a)', 'metadata caldera.format ', status, text
  status = caldera_metadata(model, "caldera.data.steps", text)
  if (status == CALDERA_OK) then
    print '(a, i0, 1x, a)', 'metadata caldera.data.steps ', status, text
  else
    print '(a, i0, 1x, a)', 'error metadata ', status, caldera_last_error()
  end if

  ! Fortran arrays are the C shapes reversed.
  open(newunit=u, file=trim(xfile), access='stream', form='unformatted', status='old')
  if (nx == 2) then
    allocate(x2(xs(2), xs(1)), y2(ys(2), ys(1)), bad2(xs(2) + 1, xs(1)), d2(xs(2), xs(1)), e2(ys(2), ys(1)))
    read(u) x2
    bad2 = 0
    status = caldera_run(model, bad2, y2)
    print '(a, i0, 1x, a)', 'error shape ', status, caldera_last_error()
    d2 = x2
    status = caldera_run(model, d2, e2)
    print '(a, i0, 1x, a)', 'error dtype ', status, caldera_last_error()
    status = caldera_run(model, x2, y2)
  else if (nx == 4) then
    allocate(x4(xs(4), xs(3), xs(2), xs(1)), y4(ys(4), ys(3), ys(2), ys(1)))
    allocate(bad4(xs(4) + 1, xs(3), xs(2), xs(1)), d4(xs(4), xs(3), xs(2), xs(1)), e4(ys(4), ys(3), ys(2), ys(1)))
    read(u) x4
    bad4 = 0
    status = caldera_run(model, bad4, y4)
    print '(a, i0, 1x, a)', 'error shape ', status, caldera_last_error()
    d4 = x4
    status = caldera_run(model, d4, e4)
    print '(a, i0, 1x, a)', 'error dtype ', status, caldera_last_error()
    status = caldera_run(model, x4, y4)
  else
    print '(a)', 'failed: rank 2 or 4 only'
    error stop 1
  end if
  close(u)
  if (status /= CALDERA_OK) then
    print '(a, i0, 1x, a)', 'failed ', status, caldera_last_error()
    error stop 1
  end if
  open(newunit=u, file=trim(yfile), access='stream', form='unformatted', status='replace')
  if (nx == 2) then
    write(u) y2
  else
    write(u) y4
  end if
  close(u)
  call caldera_free(model)
  print '(a)', 'ok'

contains

  subroutine parse(text, dims, n)
    character(len=*), intent(in) :: text
    integer, intent(out) :: dims(8), n
    integer :: start, comma
    n = 0
    start = 1
    do
      comma = index(text(start:), ',')
      n = n + 1
      if (comma == 0) then
        read(text(start:), *) dims(n)
        exit
      end if
      read(text(start:start + comma - 2), *) dims(n)
      start = start + comma
    end do
  end subroutine parse
end program check
